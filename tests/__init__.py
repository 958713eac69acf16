"""Ultralytics reads its environment at import: every test and benchmark process (this package is imported before
any of their modules) runs it offline, with a settings folder of its own (never the developer's $HOME) that is
removed when the process exits. Child processes inherit the variables, hence the folder."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("YOLO_OFFLINE", "1")
if "YOLO_CONFIG_DIR" not in os.environ:
    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="detseg-yolo-cfg-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], ignore_errors=True)
