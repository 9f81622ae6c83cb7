"""The Lightning shell: the callback, its Trainer glue, progress bars and reporting to loggers."""
