"""Running a network over a volume: the one sliding-window engine, the scoring sweep built on it,
prediction, MC dropout, devices and memory estimates."""
