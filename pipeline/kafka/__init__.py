"""Thin, lazy wrappers over confluent-kafka: producer, consumer and topic administration."""

from pipeline.kafka.admin import TopicAdmin
from pipeline.kafka.consumer import Consumer
from pipeline.kafka.producer import Producer

__all__ = ["Consumer", "Producer", "TopicAdmin"]
