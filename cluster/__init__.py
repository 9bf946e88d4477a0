"""How jobs reach machines: submitit executors (Slurm, local), sbatch options, the pre-emption
handler and requeue, job status. Imports pretrain's and evals' entry points, nothing imports it
except the ``vqscale`` command."""
