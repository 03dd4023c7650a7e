"""The torch releases the package accepts: pyproject.toml's requirement, and the import
check that gives an older torch a clear ImportError (torch 2.4 failed with an
AttributeError while registering the op, 2.5-2.7 in every compiled call, 2.8 four
tests of the suite)."""
import re
import subprocess
import sys
import warnings

import pytest
from conftest import REPO

from mra_compile.torch_support import TORCH_RANGE, check_torch, release


def test_the_range_is_pyprojects():
    text = (REPO / "pyproject.toml").read_text()
    found = re.findall(r'"torch>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text)
    assert len(found) == 1, found
    lo_major, lo_minor, hi_major, hi_minor = map(int, found[0])
    assert TORCH_RANGE == ((lo_major, lo_minor), (hi_major, hi_minor))


@pytest.mark.parametrize("version, expected", [
    ("2.13.0+cpu", (2, 13)), ("2.8.0", (2, 8)), ("2.16.0a0+git1234", (2, 16)),
    ("10.2", (10, 2)),
])
def test_release(version, expected):
    assert release(version) == expected


@pytest.mark.parametrize("version", ["2.4.1+cu121", "2.7.1", "2.10.0+cu128", "1.13.1", "2.0.0"])
def test_an_older_torch_is_an_import_error_naming_both_versions(version):
    with pytest.raises(ImportError, match=rf"torch >= 2\.11 \(found torch {re.escape(version)}\)"):
        check_torch(version)


@pytest.mark.parametrize("version", ["2.11.0", "2.13.0+cpu", "2.15.0+cu132"])
def test_supported_releases_pass_silently(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_torch(version)


def test_a_newer_torch_warns_that_it_is_untested():
    with pytest.warns(UserWarning, match=r"tested with torch 2\.11 to 2\.15; found torch 2\.16"):
        check_torch("2.16.0a0+git1234")


def test_an_unreadable_version_is_a_value_error():
    with pytest.raises(ValueError, match="torch version 'nightly'"):
        check_torch("nightly")


def test_importing_under_an_older_torch_says_which_torch_it_needs():
    # (the version string is what an older install reports; the check runs before the
    # op is registered, so nothing else of the older torch is needed to see it)
    code = "import torch; torch.__version__ = '2.5.1'; import mra_compile"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: mra_compile needs torch >= 2.11 (found torch 2.5.1)"), last
