from vlreason.cli import main

raise SystemExit(main())
