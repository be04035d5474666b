"""Parts the relay, the operator and the sandbox share. Standard library only: importing it pulls in
neither program's dependencies."""
