"""Segmentation with shipped networks.

- :mod:`mskmri.segment.spine`: vertebral bodies of sagittal spine MRI
  (``mskmri segment spine IMAGE OUT``), trained by :mod:`mskmri.segment.spine_train`.
- Knee segmentation lives beside it (:mod:`mskmri.segment.knee`).

torch is imported only when a network runs, so importing this package stays light.
"""
