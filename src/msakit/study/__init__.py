"""Studies: a benchmark grid as a YAML file, run on Ray or in this process, reported from its store."""

from msakit.study.records import export_records, import_records
from msakit.study.report import report_study
from msakit.study.runner import plan_jobs, run_study, study_status
from msakit.study.spec import load_study

__all__ = ["export_records", "import_records", "load_study", "plan_jobs", "report_study", "run_study",
           "study_status"]
