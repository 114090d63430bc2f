"""fedrec.optimization: the ``optimizer`` and ``lr_scheduler`` registry kinds.

Importing this package registers the built-in optimizers (``sgd``, ``adagrad``,
``rowwise_adagrad``, ``adam``, ``yogi``, ``sparse_adam``, ``split``) and LR schedulers (``noop``,
``step``, ``cosine``, ``dlrm``)::

    opt = registry.construct("optimizer", cfg["train"]["optimizer"], model=model)
    sched = registry.construct("lr_scheduler", cfg["train"]["lr_scheduler"], optimizer=opt)
"""

from fedrec.optimization import optimizers, schedulers  # noqa: F401  (registrations)
from fedrec.optimization.optimizers import (  # noqa: F401
    DENSE_OPTIMIZERS,
    SPARSE_OPTIMIZERS,
    RowWiseAdagrad,
    SparseAdam,
    SplitOptimizer,
    build_optimizer,
    embedding_parameters,
    split_parameters,
)
from fedrec.optimization.schedulers import (  # noqa: F401
    ConstantScheduler,
    DLRMScheduler,
    build_lr_scheduler,
    dlrm_lr_scale,
)
