import locale
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


# The suite runs on two pytest-xdist workers (`make test`: -n 2 --dist loadgroup). Each module's tests stay on one
# worker, so a module-scoped fixture (a trained network) is built once; the modules that read the shared tiny run
# (conftest.tiny_run) share one group, so it runs once. The SLURM test, which mostly waits on the scheduler, then
# overlaps with the CPU-bound tests on the other worker.
TINY_RUN_MODULES = ("test_workflow", "test_reproducible")


def pytest_collection_modifyitems(items):
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            module = item.module.__name__
            item.add_marker(pytest.mark.xdist_group("tiny_run" if module in TINY_RUN_MODULES else module))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run fastest on one thread, and do not slow to a crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def process_locale_restored():
    """ITK's DICOM code (GDCM), in tests that write or read DICOM, can leave the process locale at "C";
    every later test in this process would then open text files as ASCII. Each test starts as the run did."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny audit (tests/test_workflow.py's tiny_config, two experiments), run once through snakemake for every
    test that reads a finished run: the workflow's outputs, the rerun plan, the reproducibility check."""
    from test_workflow import CPU_RUN, snakemake, tiny_config, write_config

    workdir = tmp_path_factory.mktemp("tiny")
    write_config(workdir, tiny_config())
    snakemake(workdir, *CPU_RUN)
    return workdir
