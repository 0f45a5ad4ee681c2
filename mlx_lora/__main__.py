from mlx_lora.cli import main

main()
