"""The package's shape: lazy imports, named tests, and private internals kept in one module."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent


def imported_by(statement: str) -> set[str]:
    """The modules a fresh interpreter loads to run ``statement``."""
    out = subprocess.run([sys.executable, "-c", f"import sys; {statement}; print(*sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


class ImportTests(unittest.SynchronousTestCase):
    def test_certs_loads_no_websocket_stack(self) -> None:
        """import meshd.mesh.certs (meshctl certs) loads neither Autobahn nor the node."""
        modules = imported_by("import meshd.mesh.certs")
        self.assertIn("meshd.mesh.certs", modules)
        self.assertEqual([m for m in modules if m.startswith(("autobahn", "meshd.app", "twisted.web"))], [])

    def test_root_names_load_when_used(self) -> None:
        """meshd's public names still import, each when first used."""
        modules = imported_by("import meshd; meshd.Watchable")
        self.assertIn("meshd.codec", modules)
        self.assertNotIn("meshd.app", modules)
        import meshd

        for name in meshd.__all__:
            self.assertIsNotNone(getattr(meshd, name), name)


class ModuleHeaderTests(unittest.SynchronousTestCase):
    def test_test_case_names_exist(self) -> None:
        """Every module's test-case-name names a test module that exists."""
        named = 0
        for path in sorted((ROOT / "meshd").rglob("*.py")) + sorted((ROOT / "twisted").rglob("*.py")):
            if "/fb/" in str(path):
                continue
            match = re.search(r"test-case-name: ([\w.]+)", path.read_text())
            if match is None:
                continue
            named += 1
            target = ROOT / (match.group(1).replace(".", "/") + ".py")
            self.assertTrue(target.exists(), f"{path.relative_to(ROOT)} names {match.group(1)}")
        self.assertGreater(named, 20)


class PrivateInternalsTests(unittest.SynchronousTestCase):
    def test_only_the_io_module_reads_internals(self) -> None:
        """Twisted's and Autobahn's private attributes appear only in meshd/_io.py (and its contract test)."""
        words = ("_tempDataLen", "writeSomeData", "_flushSendBIO", "_tlsConnection", "current_frame",
                 "inside_message", "object.__new__", "_batched_timer", "payloadHybi", "_dataReceived")
        out = subprocess.run(["git", "grep", "--untracked", "-n", "-E", "-e", "|".join(words), "--", "*.py"],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode not in (0, 1):  # not a git checkout: search by hand
            lines = [f"{p.relative_to(ROOT)}:{line}" for p in ROOT.rglob("*.py") if ".venv" not in p.parts
                     for line in p.read_text().splitlines() if any(w in line for w in words)]
        else:
            lines = out.stdout.splitlines()
        allowed = ("meshd/_io.py:", "tests/test_io.py:", "tests/test_layout.py:")
        self.assertEqual([line for line in lines if not line.startswith(allowed)], [])
