"""Pool broadcast: host masters, gathers that always complete."""
