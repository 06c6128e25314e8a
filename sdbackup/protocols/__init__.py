"""Wire protocols: frames in, typed messages out. No disk, no catalog here."""
