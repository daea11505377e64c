from avatarchat.cli import main

raise SystemExit(main())
