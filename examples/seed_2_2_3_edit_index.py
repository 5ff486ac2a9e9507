"""PaddleX's PP-ShiTuV2 tutorial §2.2.3 (add to / remove from the index), with `from shitu import`.

Only the import and the data paths differ from the PaddleX example; `remove_ids.txt` holds one
id per line (examples/remove_ids.txt removes ids 0–2). Run from the repo root:
    python examples/seed_2_2_3_edit_index.py [DATASET_DIR]
"""

import sys

from shitu import create_pipeline

DATA = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/drink_dataset"

pipeline = create_pipeline("PP-ShiTuV2")
index_data = pipeline.build_index(
    gallery_imgs=f"{DATA}/", gallery_label=f"{DATA}/gallery.txt", index_type="IVF", metric_type="IP"
)
index_data = pipeline.append_index(gallery_imgs=f"{DATA}/", gallery_label=f"{DATA}/gallery.txt", index=index_data)
index_data = pipeline.remove_index(remove_ids="examples/remove_ids.txt", index=index_data)
index_data.save("drink.index")
print(index_data.summary())
