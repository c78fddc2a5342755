"""The synthetic abdominal CT cohort (the embedded default): phantoms with the 13 BTCV organ labels
and an exact anatomical correspondence between any two subjects.

    cohort.py    generate / cache cohorts in the BTCV layout, held-out subjects
    template.py  the one template anatomy (tissues, organs, landmarks)
    maps.py      smooth invertible template -> subject maps, correspondence between subjects
    render.py    scanner grids (field of view, spacing, orientation) and rendering to HU
"""

from alice3d.data.phantom.cohort import (
    PHANTOM_VERSION,
    SIZES,
    SubjectMap,
    build_cache_dir,
    cache_root,
    case_id,
    correspond,
    default_cohort,
    generate_cohort,
    get_template,
    held_out_phantom,
    landmarks_in_subject,
    load_cohort_maps,
    load_maps_file,
    make_subject,
    render_case,
    resolve_size,
    split_counts,
    template_landmarks,
)

__all__ = [
    "PHANTOM_VERSION", "SIZES", "SubjectMap", "build_cache_dir", "cache_root", "case_id", "correspond",
    "default_cohort", "generate_cohort", "get_template", "held_out_phantom", "landmarks_in_subject",
    "load_cohort_maps", "load_maps_file", "make_subject", "render_case", "resolve_size", "split_counts",
    "template_landmarks",
]
