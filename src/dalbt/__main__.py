from dalbt.cli import main

raise SystemExit(main())
