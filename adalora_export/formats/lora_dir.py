"""The PEFT LoRA directories ``export --to lora`` writes (``converters/lora.py``): the adapter formats
``--to`` converts to and the layouts (README, "Prune, inspect, LoRA export"). Nothing here imports
torch: the command line reads its choices from here."""

LORA_FORMATS = ("lora",)  # what --to converts to
LORA_LAYOUTS = ("compact", "uniform")  # the first is the default
