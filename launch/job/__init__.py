# The training job (cpdit-launch train) and what it is made of; launch/ proper starts the processes.
