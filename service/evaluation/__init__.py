"""``detseg eval``: a COCO instance-segmentation dataset through the service, measured with pycocotools
(``metrics``), simulated annotator clicks (``noc``), and a report (``report``)."""
