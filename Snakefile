# GuGuGirls / maskface: masked face generation and masked face recognition.
#   snakemake --cores all                                   # everything, default config.yaml
#   snakemake --cores all --configfile config/lfw-local.yaml
#   snakemake --cores all <target>                          # one stage: see `rule` names in workflow/rules/
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

# Jobs (and this file) use this checkout's package, installed or not, in any environment (--sdm conda too).
_SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, _SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)


configfile: "config.yaml"


# Stops the run before any job with one short line per mistake (key path, bad value, what is allowed)...
from maskface.configcheck import ConfigError, check_config

try:
    check_config(config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"),
                 paths=workflow.is_main_process)
except ConfigError as _err:
    raise WorkflowError(str(_err)) from None
# the train section as written (a preset's sizes go under the user's own keys, not under the schema's defaults)
import copy

USER_TRAIN = copy.deepcopy(config.get("train") or {})
# ... then fills in every default of the schema.
validate(config, schema="workflow/schemas/config.schema.yaml", set_default=True)


report: "workflow/report/workflow.rst"


# The pipeline, stage by stage (each file holds rules only; the plan, paths and input functions are in common.smk).
include: "workflow/rules/common.smk"


wildcard_constraints:
    dataset="|".join(DATASETS),
    shard=r"\d+",
    variant="clean|masked",
    cvariant="clean|masked",
    model="|".join(re.escape(m) for m in EVAL_MODELS) or "no-model-configured",
    run="|".join(re.escape(r) for r in TRAIN_RUNS) or "no-run-configured",
    tgroup="|".join(re.escape(g) for g in TRAIN_EVALS) or "no-group-configured",


include: "workflow/rules/download.smk"
include: "workflow/rules/manifest.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/mask.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/demo.smk"


rule all:
    default_target: True
    input:
        final_targets(),
