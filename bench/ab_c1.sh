#!/bin/bash
# A/B at c=1: OLD (a commit, default bd716ca: before issue 14) vs the working tree, alternating
# ABAB, one server at a time, the exercise grid paused (SIGSTOP) while it measures.
# Usage: bash bench/ab_c1.sh [OLD_COMMIT] ; results in bench/cpu-2core/ab-issue14/
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OLD=${1:-bd716ca}
OUT=$ROOT/bench/cpu-2core/ab-issue14
M=$ROOT/models/nin-fashion-mnist
git -C "$ROOT" worktree add -f --detach /tmp/nin-ab-old "$OLD" >/dev/null
mkdir -p "$OUT" /tmp/nin-ab
wait_ready() { for i in $(seq 200); do curl -sf "$1/readyz" >/dev/null && return 0; sleep 0.3; done; return 1; }
pkill -STOP -f "training.experiments" ; sleep 1
for round in 1 2; do
  for which in old new; do
    dir=$ROOT; [ $which = old ] && dir=/tmp/nin-ab-old
    (cd $dir && NIN_MODEL=$M PYTHONPATH=$dir setsid "$ROOT/.venv/bin/python" -m bentoml serve --host 127.0.0.1 --port 3111 >/tmp/ab-$which.log 2>&1 &)
    wait_ready http://127.0.0.1:3111 || echo "not ready $which"
    echo "$which round $round ui=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:3111/ui)"
    (cd "$ROOT" && .venv/bin/python -m bench --url http://127.0.0.1:3111 --python-concurrency 1 --native-concurrency 1 \
       --duration 15 --out /tmp/nin-ab/$which-$round >/tmp/nin-ab/$which-$round.log 2>&1)
    cp /tmp/nin-ab/$which-$round/bench.md "$OUT/$which-$round.md"
    pkill -f "port 3111"; pkill -f "_bentoml_impl.worker"; sleep 3
  done
done
pkill -CONT -f "training.experiments"
git -C "$ROOT" worktree remove --force /tmp/nin-ab-old
