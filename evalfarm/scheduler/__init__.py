"""The one home of a job's lifecycle.

    plan.py        how each side is obtained and cut into shards (`JobPlan`, `SidePlan`)
    job.py         a job row as one typed snapshot (`JobSnapshot`), config and plan decoded once
    records.py     every read and write of jobs, shards, results and references the steps make
    deadlines.py   the reconciler's view: live steps past their deadline, ended jobs' leftovers
    queries.py     what users ask: a job's status, a run's results, the references
    steps.py       plan_job → run_shard × K → reduce_job, safe to repeat
    lease.py       the one heartbeat of a running shard, which also notices a cancel
    partials.py    where finished shards leave their statistics (in memory, or Redis + feature store)
    references.py  cached and named reference statistics, pytorch-fid statistics files
    store.py       the feature store (a directory or an fsspec URL)
    context.py     database + feature store + partials: embedded or farm
    embedded.py    `evalfarm eval`: the steps in this process
"""
