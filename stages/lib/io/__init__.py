"""Files: atomic all-or-none writes, validated table and JSON reads, logging and the stage runner, cost records."""
