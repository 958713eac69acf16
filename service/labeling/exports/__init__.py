"""Labeled images → annotation formats: COCO instances JSON, an ultralytics YOLO segmentation dataset, CVAT for images
1.1 XML, and Label Studio tasks with brush-label predictions.

Every writer takes the same inputs: ``images`` (``LabeledImage`` records: boxes XYXY in original-image pixels, masks
COCO RLE of the whole image), ``categories`` (the label set, its order gives the ids: COCO 1..N, YOLO 0..N-1; CVAT and
Label Studio name labels) and ``out`` (a folder, created if missing; files already there with the same names are
replaced). Before anything is written every instance is checked: a label not in ``categories`` raises ValueError
naming it, as does a mask whose size is not its image's, a duplicate category, or a category or file name that is not
printable text (``service.printable``: no control or format characters; any script, quotes, ``&`` and ``<>`` are
fine).

Every writer builds its files' contents in memory first (XML through ElementTree's serializer, which escapes, and
parsed back before anything is written; JSON and YAML through their serializers), so a failure leaves nothing behind;
each file is then written to a temporary sibling and renamed into place, so a reader never sees half a file.
``service.labeling.run.write_exports`` builds a whole export folder aside and renames it into place the same way.

Instances with an empty mask are left out of every format: there is nothing to draw, COCO evaluation cannot match
them and CVAT has no empty mask element.

Formats that carry images (YOLO, CVAT) take ``image_dir``, the folder ``LabeledImage.file_name`` is relative to, and
place each image under ``out/images/<file_name>``: as a symlink to the source's resolved path by default (instant, no
space; the folder then depends on the source folder staying where it is), or as a copy with ``image_mode="copy"``
(a self-contained folder to zip or move).

Modules: ``coco`` (``write_coco``), ``yolo`` (``write_yolo_seg``), ``cvat`` (``write_cvat``), ``label_studio``
(``write_label_studio``, ``label_studio_config``) and ``common``, what they share (the input checks, image placement,
XML well-formedness, atomic writes). Every public name is importable from here.
"""

from service.labeling.exports.coco import COCO_FILE, write_coco
from service.labeling.exports.common import IMAGES_DIR, ImageMode
from service.labeling.exports.cvat import CVAT_FILE, CvatMaskRle, write_cvat
from service.labeling.exports.label_studio import (
    LABEL_STUDIO_BRUSH,
    LABEL_STUDIO_CONFIG_FILE,
    LABEL_STUDIO_IMAGE,
    LABEL_STUDIO_TASKS_FILE,
    LabelStudioExport,
    label_studio_config,
    write_label_studio,
)
from service.labeling.exports.yolo import YOLO_DATA_FILE, check_label_paths, write_yolo_seg

__all__ = [
    "COCO_FILE",
    "CVAT_FILE",
    "IMAGES_DIR",
    "LABEL_STUDIO_BRUSH",
    "LABEL_STUDIO_CONFIG_FILE",
    "LABEL_STUDIO_IMAGE",
    "LABEL_STUDIO_TASKS_FILE",
    "YOLO_DATA_FILE",
    "CvatMaskRle",
    "ImageMode",
    "LabelStudioExport",
    "check_label_paths",
    "label_studio_config",
    "write_coco",
    "write_cvat",
    "write_label_studio",
    "write_yolo_seg",
]
