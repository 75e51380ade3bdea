"""Reusable test machinery: a private RabbitMQ node and a fault-injecting TCP proxy."""
