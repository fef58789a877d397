"""The task registry: every task ray_med knows, by name, in one table.

A :class:`Task` says what a task reads (a reader format and the record fields it feeds
the model), what it predicts (a label space and a type), how a language model is asked
(a prompt style, for tasks an LM answers) and which metric ranks models on it. The same
entry serves a classifier head (``jobs/finetune.py``, ``evaluate.py classify``) and an LM
prompt (``evaluate.py qa``, ``/v1/qa``): PubMedQA is one task whichever way it is solved.

Tasks the multimodal model (Med-PaLM M) is trained and scored on carry an
:class:`~ray_med.tasks.instructions.Instruction`: its instruction, context template,
question, answer format and text-only one-shot exemplar.

Adding a task is one :class:`Task` line in :data:`TASKS` (or :func:`register_task` from
another module, for tasks that live with their own code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ray_med.config import lookup
from ray_med.errors import ConfigError
from ray_med.tasks.instructions import Exemplar, Instruction

TaskType = Literal["binary", "multiclass", "multilabel"]
PromptStyle = Literal["mcq", "yesno"]
"""How an LM is asked: ``mcq`` lists lettered options, ``yesno`` asks yes/no/maybe."""


@dataclass(frozen=True)
class Task:
    """What a task reads and predicts, and how a model is asked and scored."""

    name: str
    reader: str
    """Reader format of its data files (``ray_med.data.READERS``)."""
    task_type: TaskType
    text: str
    """Record field (or ``meta.<key>``) for the first text."""
    text_pair: str | None
    """Record field for the second text (the context), if the task has one."""
    label_field: Literal["answer", "label", "labels"]
    labels: tuple[str, ...] | None = None
    """The label space; None: the classes in the data with at least ``min_count`` examples."""
    min_count: int = 1
    ordinal: bool = False
    """Ordered buckets (length of stay): AUROC is one-vs-one."""
    prompt: PromptStyle | None = None
    """How a causal LM is asked (``ray_med.tasks.prompts``); None: heads only."""
    metric: str = "auroc_macro"
    """The headline metric: what early stopping, sweeps and the run index rank by."""
    description: str = ""
    """One line for listings and ``--help``."""
    instruction: Instruction | None = None
    """How the multimodal model is asked (``jobs/multimodal.py``, ``evaluate.py multimodal``); None: not a
    multimodal task."""


_MCQ = Instruction(
    "choice", "The following are multiple choice questions about medical knowledge. Answer with the letter of the "
    "correct option.", options="record",
    exemplar=Exemplar("Which vitamin deficiency causes scurvy?", "Vitamin C",
                      options=("Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D")),
)
_PUBMEDQA = Instruction(
    "choice", "Answer the biomedical research question about the abstract with yes, no or maybe.",
    context="Context: {context}", options="words",
    exemplar=Exemplar("Does regular aspirin use lower the risk of colorectal adenoma?", "yes",
                      context="In a randomised trial, aspirin reduced the incidence of colorectal adenomas."),
)
_CXR = "You are a helpful radiology assistant."
_VQA = Instruction(
    "generate", f"{_CXR} Answer the question about the medical image in a few words.", context="Given {image}.",
    exemplar=Exemplar("Is there a pleural effusion?", "no", context="Given the chest X-ray <img>."), image=True,
    metric="vqa",
)

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("medqa", "medqa", "multiclass", "question", None, "answer", None, prompt="mcq", metric="accuracy",
             description="MedQA (USMLE): a question with lettered options -> the letter", instruction=_MCQ),
        Task("medmcqa", "medmcqa", "multiclass", "question", None, "answer", ("A", "B", "C", "D"), prompt="mcq",
             metric="accuracy", description="MedMCQA: a question with options A-D -> the letter", instruction=_MCQ),
        Task("pubmedqa", "pubmedqa", "multiclass", "question", "context", "answer", ("yes", "no", "maybe"),
             prompt="yesno", description="PubMedQA reasoning-required: question + abstract -> yes/no/maybe",
             instruction=_PUBMEDQA),
        Task("pubmedqa_rf", "pubmedqa", "multiclass", "question", "meta.long_answer", "answer",
             ("yes", "no", "maybe"), prompt="yesno",
             description="PubMedQA reasoning-free: question + long answer -> yes/no/maybe"),
        Task("pneumonia", "medmnist", "binary", "image", None, "label", ("normal", "pneumonia"),
             description="PneumoniaMNIST: a paediatric chest X-ray -> normal or pneumonia, as multiple choice",
             instruction=Instruction(
                 "choice", f"{_CXR} Identify whether the chest X-ray shows pneumonia.",
                 context="Given the chest X-ray {image}.", question="Which finding does the X-ray show?",
                 options="labels", exemplar=Exemplar("Which finding does the X-ray show?", "normal",
                                                     context="Given the chest X-ray <img>."), image=True)),
        Task("vqa_rad", "vqa_json", "multiclass", "question", None, "answer", None, metric="token_f1",
             description="VQA-RAD (JSON): a radiology image and a question -> a short answer", instruction=_VQA),
        Task("slake", "vqa_json", "multiclass", "question", None, "answer", None, metric="token_f1",
             description="SLAKE (JSON, English): a medical image and a question -> a short answer",
             instruction=_VQA),
        Task("cxr_report", "report_json", "multiclass", "text", None, "answer", None, metric="rouge_l",
             description="MIMIC-CXR-style reports: a chest X-ray -> its findings and impression",
             instruction=Instruction(
                 "generate", f"{_CXR} Write the findings and impression of the radiology report for the chest "
                 "X-ray.", context="Given the chest X-ray {image}.", question="What is the report?",
                 exemplar=Exemplar("What is the report?", "FINDINGS: The lungs are clear. No pleural effusion. "
                                   "IMPRESSION: No acute cardiopulmonary process.",
                                   context="Given the chest X-ray <img>."), image=True, metric="report")),
        Task("mtsamples_specialty", "mtsamples", "multiclass", "text", None, "label", None, min_count=10,
             description="MTSamples: transcription -> medical specialty (classes with >= 10 notes)"),
        Task("breast_cancer", "breast_cancer_csv", "binary", "meta.features", None, "label", ("malignant", "benign"),
             description="Wisconsin breast cancer (scikit-learn's CSV): 30 tumour features -> malignant or benign"),
        Task("heartbeat", "mitbih_csv", "multiclass", "meta.features", None, "label", ("N", "S", "V", "F", "Q"),
             description="MIT-BIH heartbeats (Kaggle's CSV schema): a 187-sample beat -> AAMI class N/S/V/F/Q"),
        Task("mimic_mor", "mimic_outcomes", "binary", "text", None, "label", ("0", "1"),
             description="MIMIC outcome CSV: admission note -> in-hospital mortality"),
        Task("mimic_pmv", "mimic_outcomes", "binary", "text", None, "label", ("0", "1"),
             description="MIMIC outcome CSV: note -> prolonged mechanical ventilation"),
        Task("mimic_los", "mimic_outcomes", "multiclass", "text", None, "label", ("0", "1", "2", "3"),
             ordinal=True, description="MIMIC outcome CSV: note -> length-of-stay bucket (ordinal)"),
        Task("mimic_diag", "mimic_outcomes", "multilabel", "text", None, "labels", None,
             description="MIMIC outcome CSV: note -> ICD-9 diagnoses (multi-label)"),
        Task("mimic_proc", "mimic_outcomes", "multilabel", "text", None, "labels", None,
             description="MIMIC outcome CSV: note -> ICD-9 procedures (multi-label)"),
    ]
}


def register_task(task: Task) -> Task:
    """Add a task to the registry (a name may be registered once)."""
    if task.name in TASKS and TASKS[task.name] != task:
        raise ConfigError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task called ``name``, or a clear error listing the valid ones."""
    return lookup(TASKS, name, "task")


def prompt_formats() -> tuple[str, ...]:
    """Reader formats an LM can be asked in (``evaluate.py qa --format``)."""
    return tuple(dict.fromkeys(t.reader for t in TASKS.values() if t.prompt))


def multimodal_tasks() -> list[str]:
    """Names of the tasks the multimodal model can be asked (those with an instruction)."""
    return [n for n, t in TASKS.items() if t.instruction is not None]


def get_multimodal_task(name: str) -> Task:
    """The multimodal task called ``name``, or a clear error listing the valid ones."""
    task = lookup({n: TASKS[n] for n in multimodal_tasks()}, name, "multimodal task")
    return task


def task_for_format(fmt: str) -> Task | None:
    """The default LM task of a reader format: the first task with a prompt that reads it."""
    return next((t for t in TASKS.values() if t.reader == fmt and t.prompt), None)
