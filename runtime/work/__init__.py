"""The work floor: what runs in runtimes on a caller's behalf.

The runner core (script, command, llm, host), dispatch (route a task, run it, collect its
result) and agent teams (members, messages, tasks, plans). Imports the floors below it only.
"""
