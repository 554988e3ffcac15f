"""Population dry run (`b12-cds audit`): every patient of a FHIR Bulk Data export through the
same `ClinicalEngine.evaluate` the hooks call, to estimate firing rates before go-live.

Pipeline (each step a module):
1. `inputs`: find the export's files (NDJSON per resource type, or Bundle JSON files) and cut
   them into partitions (byte ranges of NDJSON files, aligned on line ends; one Bundle file each).
2. `shards`: each partition is read on its own and its resources are hash-partitioned by patient
   id into shard files on disk, so no process ever holds a whole resource type or joins the
   population in memory.
3. `evaluate`: each shard (a few thousand patients) is grouped by patient, turned into a
   `PatientRecord` and evaluated; the result is a mergeable `Tally` plus one row per patient.
4. `runner`: runs 2 and 3 on a local process pool or on a Dask distributed cluster (the same
   task functions either way) with a progress bar, then merges the tallies in shard order.
`report` turns the merged tally into the report (JSON; `reports.html` renders it), and
`bulk_export` starts a `$export` on a FHIR server and downloads its output files.

The audit shows what the rules would show.  The alert policy that acts on feedback
(suppression after a dismissal, silent mode) is not applied: before go-live nothing has been
dismissed, and a silent-mode pilot is what the audit prepares.
"""
