"""Test order: the files with slow tests (whole runs, mostly of several processes) first, each file's tests kept
together and in order. `make test` runs the suite on two pytest-xdist workers, a file to each at a time: a long
file started last would leave one worker running alone at the end."""


def pytest_collection_modifyitems(items):
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # a stable sort: the order within each group is kept
