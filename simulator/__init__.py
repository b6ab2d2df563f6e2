"""``gapaware simulate``: N virtual asynchronous workers on one machine, the way the paper evaluated GA.

:mod:`.clock` draws the workers' batch times and orders completions, :mod:`.gradients` computes
their gradients with one shared model, :mod:`.master` applies them with the parameter server's
own state and policy code, :mod:`.runner` runs one policy at one N, :mod:`.sweep` the grid of
policies × N × seeds, and :mod:`.report` writes the table and the plot.
"""
