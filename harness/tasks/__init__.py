"""Tasks the training loop drives through one interface (:mod:`.base`): image classification
(:mod:`.classification`) and COCO detection with RetinaNet (:mod:`.detection`)."""
