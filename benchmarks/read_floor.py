"""The read floor: one process iterating the dataset's TFRecord files with tf.data, no parsing."""

import glob
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

files = sorted(glob.glob(os.path.join(sys.argv[1], "*.tfrecord-*")))
total = 0
for record in tf.data.TFRecordDataset(files):
    total += 1
print(total)
