"""`python -m bench`: the running service measured beside what a user would write by hand.

Lives beside `serving/`, not in it: it imports torch and `training` (the in-process PyTorch
baseline), a reference FastAPI server and load generators, none of which the served bento
carries. Results of committed runs sit in subfolders named after the hardware (bench/cpu-2core/).
"""
