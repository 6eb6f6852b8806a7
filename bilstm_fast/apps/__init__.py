"""Applications of the library, apart from it: the MNIST classifier (`train_mnist`, with its
data loading in `data`) and the jokes text generator (`textgen`). Run them as
`python -m bilstm_fast.apps.train_mnist` and `python -m bilstm_fast.apps.textgen`.

The library (`bilstm_fast`'s top level and `bilstm_fast.kernels`) never imports from here.
"""
