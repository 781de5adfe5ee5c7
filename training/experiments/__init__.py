"""The textbook's NiN exercises (d2l.ai 8.3), answered with measurements.

`python -m training.experiments --budget cpu|gpu` runs the declared grid (grid.py), one arm per
child process (runner.py), and writes reports/nin-exercises/ (report.py); floor.py is the
floor-rounding demonstration.
"""
