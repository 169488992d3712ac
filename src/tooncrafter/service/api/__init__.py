"""The HTTP surface: fal's queue and run routes, file routes, the playground, and the protocol they share."""
