"""Build hook: a wheel carries the top-level images/ and templates/ folders as vmtool/_data/.

Everything else is in pyproject.toml. In a checkout, vmtool.datafiles finds the folders themselves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's own folders
            return
        for folder in ("images", "templates"):
            dst = Path(self.build_lib) / "vmtool" / "_data" / folder
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(HERE / folder, dst)


setup(cmdclass={"build_py": BuildWithData})
