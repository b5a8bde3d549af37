"""What every stage runs on: the trainer and loggers, hardware and threads, precision, distributed processes,
progress bars, errors and seeds; and ``log``, the one logger every module of cvdd writes to."""

import logging

log = logging.getLogger("cvdd")
