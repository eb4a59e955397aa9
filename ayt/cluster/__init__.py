"""The autoscaled cluster, rehearsed on one machine before paying for GPUs: Ray's autoscaler
with a node provider that starts worker nodes as local processes (`provider`), the cluster
started and stopped by its own temp dir (`rehearsal`), the servers a cluster run uses on
127.0.0.1: PostgreSQL, an S3-compatible store, MLflow (`services`), and a study submitted
and measured as the README's cluster recipe runs it (`rehearse`). `python -m ayt.cluster`."""
