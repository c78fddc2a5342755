"""Pictures on real libraries (bottom layer: numpy, Pillow, matplotlib, nibabel only).

Modules: ``png`` (PNG write/read with Pillow), ``text`` (text on RGB arrays), ``mosaic``
(tiling panels into a grid with titles), ``ortho`` (windowed ortho-slice previews, label
overlays, reconstruction panels), ``plots`` (line/scatter/bar plots with matplotlib).

Nothing is imported here, so that writing a preview does not pull in matplotlib.
"""
