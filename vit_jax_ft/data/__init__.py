"""Dataset preparation: turning images into TFRecords with a dataset_info.json."""
