"""Training machinery shared by train.py, eval.py and the scripts. Kept import-free on purpose."""
