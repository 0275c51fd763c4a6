"""What a pretrained backbone is used for once training is done, as library code the eval apps and
the demo call: the backbone as a torchvision detection backbone (``detection_backbone``), and the PCA / attention pictures
(``visualize``). The one feature extraction (the trainer's k-NN monitor uses it too) is
``ssl_container.utils.features``. Exporting a run's weights is ``ssl_container.export``."""
