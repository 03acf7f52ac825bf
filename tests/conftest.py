import locale
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


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
