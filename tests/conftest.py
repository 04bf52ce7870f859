"""Test order: the files with slow tests (whole runs, mostly of several processes) first, the longest of them (by
`pytest --durations`) at the head; each file's tests kept together and in order. `make test` runs the suite on two
pytest-xdist workers, a file to each at a time: a long file started last would leave one worker running alone at
the end."""

LONGEST = ["test_train_e2e.py", "test_resume.py", "test_gpu_check.py", "test_slurm.py"]


def pytest_collection_modifyitems(items):
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        if item.path.name in LONGEST:
            return LONGEST.index(item.path.name)
        return len(LONGEST) + (item.path not in slow)

    items.sort(key=rank)  # a stable sort: the order within each group is kept
