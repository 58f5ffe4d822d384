"""Post-install repairs for the CPU stack, applied only when needed.

PyPI's torchvision wheel is a CUDA build; beside torch's +cpu build its compiled
ops fail to load (`operator torchvision::nms does not exist`). Transformers' image
processors and vLLM's multimodal models only need torchvision's pure-Python
transforms, so when `import torchvision` fails we move the two CUDA-linked
extension modules aside and make the two unguarded fake-kernel registrations
conditional. Nothing is changed when torchvision already imports.

Usage: python -m tlq.install_fixes   (inside the environment to repair)
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys

log = logging.getLogger("tlq.install")

_FAKE_REG = re.compile(r'@torch\.library\.register_fake\("(torchvision::q?nms)"\)')


def torchvision_imports(python: str = sys.executable) -> bool:
    probe = subprocess.run([python, "-c", "import torchvision.transforms.v2.functional"],
                           capture_output=True, text=True)
    return probe.returncode == 0


def fix_torchvision() -> bool:
    """Repair torchvision if it fails to import; returns True when a repair was applied."""
    if importlib.util.find_spec("torchvision") is None or torchvision_imports():
        return False
    pkg = os.path.dirname(importlib.util.find_spec("torchvision").origin)
    for lib in ("_C.so", "image.so"):
        path = os.path.join(pkg, lib)
        if os.path.exists(path):
            os.replace(path, path + ".cuda-disabled")
    meta = os.path.join(pkg, "_meta_registrations.py")
    with open(meta) as f:
        src = f.read()
    patched = _FAKE_REG.sub(
        r'@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda f: f))', src)
    if patched != src:
        with open(meta + ".tmp", "w") as f:
            f.write(patched)
        os.replace(meta + ".tmp", meta)
    if not torchvision_imports():
        raise RuntimeError("torchvision still fails to import after the CPU repair; "
                           "reinstall it with `pip install --force-reinstall torchvision`")
    return True


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if fix_torchvision():
        log.info("tlq: torchvision's CUDA-only extensions disabled so it imports beside torch+cpu")
    else:
        log.info("tlq: torchvision imports as installed; no repair needed")


if __name__ == "__main__":
    main()
