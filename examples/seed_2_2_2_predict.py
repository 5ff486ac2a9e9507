"""PaddleX's PP-ShiTuV2 tutorial §2.2.2 (Python script integration), with `from shitu import`.

Only the import and the data paths differ from the PaddleX example. Run from the repo root:
    python examples/seed_2_2_2_predict.py [DATASET_DIR]
"""

import sys

from shitu import create_pipeline

DATA = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/drink_dataset"

pipeline = create_pipeline(pipeline="PP-ShiTuV2")

index_data = pipeline.build_index(gallery_imgs=f"{DATA}/", gallery_label=f"{DATA}/gallery.txt")
index_data.save("drink.index")

output = pipeline.predict(f"{DATA}/test_images/", index=index_data)
for res in output:
    res.print()
    res.save_to_img("./output/")
    res.save_to_json("./output/")
