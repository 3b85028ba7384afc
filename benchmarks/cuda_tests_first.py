"""A pytest plugin of gpu_check.py's test steps (``-p benchmarks.cuda_tests_first``): the selected tests of the files
in ``FIRST`` run before the others, in the order pytest collected them. pytest itself runs a selection in the order
of the folder tree, whatever the order of the paths on its command line."""

# The trainer's CUDA tests prove fp16 with a GradScaler, fused AdamW and a resume on CUDA: they must not be the ones
# a step's share cuts.
FIRST = ("tests/test_trainer.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # a stable sort: the order within each part stays
