"""Converters: turn a CompactAdapter (and a base model) into what runtimes load. Never import the trainer."""
