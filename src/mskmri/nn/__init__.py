"""Neural networks: plain ``nn.Module`` classes, one training loop, one sliding-window inferer.

Importing ``mskmri.nn`` does not import torch; its submodules do (``mskmri.nn.unet``,
``mskmri.nn.ffc``, ``mskmri.nn.inference``, ``mskmri.nn.train``). ``mskmri.nn.registry``
(model cards, weight files, trainable tasks) imports torch only inside the functions that
load or save weights, so the command line can list tasks without it.
"""
