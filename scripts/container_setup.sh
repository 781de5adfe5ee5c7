#!/bin/sh
# Runs as root while the image is built (bentofile.yaml: docker.setup_script). The service runs as
# BentoML's non-root user `bentoml`; the model files belong to root and are read-only for it, so a
# compromised or buggy service cannot alter the model it serves (the card's sha256 would catch it,
# but it need not come to that).
set -eu
models="${BENTO_PATH:-/home/bentoml/bento}/src/models"
chown -R root:root "$models"
chmod -R a-w,a+rX "$models"
