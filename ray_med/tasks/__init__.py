"""Tasks: one home for what a task is (inputs, label space, prompt or head, metric).

Core (no Ray). :mod:`~ray_med.tasks.registry` is the table of tasks by name;
:mod:`~ray_med.tasks.classification` turns records into a classifier's inputs and
targets; :mod:`~ray_med.tasks.prompts` builds the prompts a language model answers.
"""

from ray_med.tasks.classification import TaskData, class_weights, stratified_split, task_data
from ray_med.tasks.prompts import (
    COT_TRIGGER,
    MODES,
    PromptTooLong,
    QAItem,
    build_prompt,
    fit_prompt,
    item_from_record,
    select_shots,
)
from ray_med.tasks.registry import (
    TASKS,
    Task,
    get_multimodal_task,
    get_task,
    multimodal_tasks,
    prompt_formats,
    register_task,
    task_for_format,
)

__all__ = [
    "COT_TRIGGER",
    "MODES",
    "TASKS",
    "PromptTooLong",
    "QAItem",
    "Task",
    "TaskData",
    "build_prompt",
    "class_weights",
    "fit_prompt",
    "get_multimodal_task",
    "get_task",
    "multimodal_tasks",
    "item_from_record",
    "prompt_formats",
    "register_task",
    "select_shots",
    "stratified_split",
    "task_data",
    "task_for_format",
]
